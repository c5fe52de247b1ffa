"""`method: uft`, the offline losses over prepared rows: the method (`method`) and its driver (`driver`)."""
