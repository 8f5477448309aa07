"""Reg2RG Viewer: the engine (reg2rg.engine), the desktop viewer (reg2rg.app) and training (reg2rg.train)."""
__version__ = "0.1.0"
