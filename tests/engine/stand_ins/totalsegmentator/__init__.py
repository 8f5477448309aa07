"""Stand-in for the TotalSegmentator package (see ../README.md); not the real tool."""
