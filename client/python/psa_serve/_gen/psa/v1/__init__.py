"""Generated gRPC stubs (built by setup.py from proto/)."""
