"""The file formats at the edges: readers of the MUSE inputs (formats), the set of frames and
the inputs by tag (frames), the products (declared once; headers; all-or-nothing writing),
the pre-flight checks of the inputs, and the scratch tables (spill)."""
