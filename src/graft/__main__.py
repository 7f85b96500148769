from graft.cli.app import entry

entry()
