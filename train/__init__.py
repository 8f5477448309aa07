"""Headless fine-tuning (reg2rg-train) and evaluation (reg2rg-eval) on top of reg2rg.engine."""
