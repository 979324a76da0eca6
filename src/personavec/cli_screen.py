"""`personavec screen`: projection-difference screening of training data."""
