"""The console scripts: one thin module per command, on the packages beside it."""
