"""The report stage: the TinyR1-style table, verify funnels, SFT token lengths, branch loss
curves and an accuracy chart, as report/report.md with the PNG files it references."""
