"""rollout_server package: imports nothing heavy on purpose (see STYLE.md #10)."""
