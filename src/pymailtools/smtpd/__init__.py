"""The SMTP listener (sendmail -bd / -bD / -bs): policy, protocol, workers."""
