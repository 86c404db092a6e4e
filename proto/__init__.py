"""Wire definitions (tandem.v1) and their generated stubs."""
