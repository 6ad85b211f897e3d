"""The run folder: its layout and one reader, the journal, COCO writing, what a run records
(provenance), and ``label_folder``, which fills it with the engine's output."""
