"""The persona-alignment environment: personas, problems, simulated users (partners) and judges."""
