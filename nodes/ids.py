"""The pack's public names, defined once: node ids (saved in every shared workflow), websocket
event names and HTTP routes. web/js/ids.js holds the same values for the browser; a test checks
that the two agree."""

# node ids: a workflow stores these, so they never change
TINY_FLUX = "FluxDreamBoothTinyFlux"
DATASET_FOLDER = "FluxDreamBoothDatasetFolder"
DATASET_MFLUX = "FluxDreamBoothDatasetMflux"
DATASET_IMAGES = "FluxDreamBoothDatasetImages"
AUGMENT = "FluxDreamBoothAugment"
REGULARISATION = "FluxDreamBoothRegularisation"
CLASS_IMAGES = "FluxDreamBoothClassImages"
CAPTION = "FluxDreamBoothCaption"
DATASET_REPORT = "FluxDreamBoothDatasetReport"
LAYERS = "FluxDreamBoothLayers"
VALIDATION = "FluxDreamBoothValidation"
RUN = "FluxDreamBoothRun"
TRAINING_SETTINGS = "FluxDreamBoothTrainingSettings"
IMPORT_CONFIG = "FluxDreamBoothImportConfig"
TRAIN = "FluxDreamBoothTrain"
LOAD_CHECKPOINT = "FluxDreamBoothLoadCheckpoint"
APPLY = "FluxDreamBoothApply"
SAVE = "FluxDreamBoothSave"

# websocket events the Train node sends while it trains
EVENT_STATUS = "flux_dreambooth.status"
EVENT_PROGRESS = "flux_dreambooth.progress"
EVENT_CHECKPOINT = "flux_dreambooth.checkpoint"
EVENT_RENDERING = "flux_dreambooth.rendering"
EVENT_SAMPLES = "flux_dreambooth.samples"
EVENT_SCORES = "flux_dreambooth.scores"  # likeness and drift at a validation step
EVENT_QUEUED = "flux_dreambooth.queued"

# HTTP routes
ROUTE_STOP = "/flux_dreambooth/stop"

CATEGORY = "FLUX DreamBooth"
