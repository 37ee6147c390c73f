"""Developer and QA tools, never needed to reduce data: the simulator (simulate), the QA report
(report), the product comparison (compare), and the ESO pipeline as a reference (eso)."""
