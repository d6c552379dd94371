"""nodule-analyze on one CT: the pipeline, the runtime it runs on, post-processing and outputs."""
