"""The ten anatomical regions of Reg2RG, in the published order (docs/reproduction.md §1).

This is the one home of the region list: everything that names regions (masks, prompt slots,
reports, the viewer's panel, training data) imports it from here.
"""

REGIONS: tuple[str, ...] = (
    "abdomen",
    "bone",
    "breast",
    "esophagus",
    "heart",
    "lung",
    "mediastinum",
    "pleura",
    "thyroid",
    "trachea and bronchie",  # the spelling "bronchie" is part of the published data
)

REGION_INDEX: dict[str, int] = {name: i for i, name in enumerate(REGIONS)}


def canonical_region(name: str) -> str | None:
    """Map a region name as found in file names or reports to its canonical spelling, or None.

    Accepts case and separator variants (``Trachea_and_Bronchie``, ``trachea-and-bronchi``).
    """
    key = name.strip().lower().replace("_", " ").replace("-", " ")
    key = " ".join(key.split())
    if key in REGION_INDEX:
        return key
    if key in ("trachea and bronchi", "trachea and bronchus", "trachea"):
        return "trachea and bronchie"
    return None
