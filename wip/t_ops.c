/* ops section: normalisation, activations, attention, resampling, losses (in progress) */
