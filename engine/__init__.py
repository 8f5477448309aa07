"""The Reg2RG engine: study I/O, pre-processing, model, generation, attention maps, phantom. No Qt, no VTK."""
