"""Drop-in classes under the official SpikeZIP-TF names (``spikekernels.compat.spikezip``)."""
