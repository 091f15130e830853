"""netcompiler: a declarative neural-network compiler (YAML spec -> checked shapes ->
fixed-size C for forward, backward and optimizer -> numpy API)."""
__version__ = "0.1.0"
