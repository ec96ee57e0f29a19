"""Training: a generic trainer and the recipe that trains a music model on a token store."""
