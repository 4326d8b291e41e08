// The pack's public names, as nodes/ids.py defines them (a test checks that the two agree).
export const NODE = {
  TRAIN: "FluxDreamBoothTrain",
  TRAINING_SETTINGS: "FluxDreamBoothTrainingSettings",
  CAPTION: "FluxDreamBoothCaption",
  SAVE: "FluxDreamBoothSave",
};

export const EVENT = {
  STATUS: "flux_dreambooth.status",
  PROGRESS: "flux_dreambooth.progress",
  CHECKPOINT: "flux_dreambooth.checkpoint",
  RENDERING: "flux_dreambooth.rendering",
  SAMPLES: "flux_dreambooth.samples",
  SCORES: "flux_dreambooth.scores",
  QUEUED: "flux_dreambooth.queued",
};

export const ROUTE = {
  STOP: "/flux_dreambooth/stop",
};
