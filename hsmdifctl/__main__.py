from hsmdifctl.cli import entry

entry()
