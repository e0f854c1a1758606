//! The relay transport: links between two nodes through the coordinator.
