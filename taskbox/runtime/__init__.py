"""Process plumbing shared by the three processes: logging, signals, supervision."""
