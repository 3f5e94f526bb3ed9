"""The queue manager: runs due entries, triggers runs, bounces, hands to transports."""
