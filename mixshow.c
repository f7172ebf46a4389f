/* mixshow.c — the method of Mix-of-Show (Gu et al., NeurIPS 2023, arXiv:2305.18292v2), in
 * sections:
 *   ED-LoRA step + AdamW        (single-client tuning; issue: ED-LoRA training)
 *   gradient fusion + L-BFGS    (center node; issue: gradient fusion)
 *   regionally controllable sampling
 * None of these is written yet: this file holds only what the foundation needs. */
#include "mixshow.h"

const char *ms_version(void) { return MS_VERSION; }
