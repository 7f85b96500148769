"""The ``graft`` command line: one thin module per subcommand."""
