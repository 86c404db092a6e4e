"""tandem.v1: the Generate / GetModelInfo / GetServerInfo service and its generated stubs."""
