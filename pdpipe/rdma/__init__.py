"""Cross-machine KV transfer on the Mooncake Transfer Engine."""
