"""Embedded data: demo model, phantom study, presets (data only)."""
