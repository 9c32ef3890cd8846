"""One module per stage; each declares the columns it needs and adds (see `columns`)."""
