"""The `tahoefs` command (contract: ../shared/cli.md). Maps typed errors to exit codes in one place."""
