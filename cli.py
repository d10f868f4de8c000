"""ragops command-line interface (placeholder until the commands land)."""


def main() -> None:
    """Entry point of the `ragops` console script."""
    raise SystemExit("ragops: CLI under construction")
