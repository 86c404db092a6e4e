"""Configuration, launch and the `tandem` command line."""
