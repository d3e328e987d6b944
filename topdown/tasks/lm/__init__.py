"""Word-level language modelling (the paper's AWD-LSTM on WikiText-2, at CPU scale as WT2-small)."""
