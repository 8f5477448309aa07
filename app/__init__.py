"""Desktop viewer (PySide6 + VTK) on top of reg2rg.engine."""
