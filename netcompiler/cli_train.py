"""`netc train`, `netc eval`, `netc predict` (placeholder: registers nothing yet)."""


def register(sub) -> None:
    pass
