"""Tools around training: plan, bench, plot, launch."""
