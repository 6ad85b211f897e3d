"""Review in FiftyOne: the database, mask conversion, the run's dataset, the App, the
engine as a FiftyOne model, and exports of what was reviewed."""
