"""``ppg experiment``: policy classes x problems x seeds, with the paper's comparison as tables and plots."""
