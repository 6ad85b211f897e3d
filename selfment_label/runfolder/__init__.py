"""The run folder: its layout and one reader, the journal, COCO writing, and the pipeline."""
