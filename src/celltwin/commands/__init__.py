"""CLI subcommands. Each module: HELP, add_arguments(parser), run(args) -> int; stdlib-only imports at top."""
