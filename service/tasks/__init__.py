"""ID tasks: IDs parsed from a body, stored as chunks, submitted, changed and cancelled."""
