"""The queue: the only code that builds queue paths, renames or removes queue files."""
