"""aiortc peers of e-PediCare Call: patient and practitioner."""
