"""The front door: gRPC Generate endpoint, request validation and the routing policies."""
