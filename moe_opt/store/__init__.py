"""What is kept: storages, study identity, the trial schema and the one ranking of a study's results."""
