"""The `midigen` command line."""
