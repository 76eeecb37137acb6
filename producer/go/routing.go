package embedfleet

// Several models, one fleet: the naming rule of schemas/model_routing.py (examples shared in
// schemas/testdata/model_routing.json). The default model keeps the base names; every other
// model NAME gets "<base>.<NAME>", NAME with characters outside [A-Za-z0-9_.-] replaced by "_".

const (
	// DefaultModel is the model served on the base requests topic and consumer group.
	DefaultModel = "all-MiniLM-L6-v2"
	// BaseRequestsTopic is the default model's requests topic.
	BaseRequestsTopic = "embed.requests"
)

// RequestsTopicFor is the topic the jobs of model arrive on, with base the default model's topic.
func RequestsTopicFor(model, defaultModel, base string) string {
	return derivedName(model, defaultModel, base)
}

// GroupIDFor is the consumer group of the workers that serve model.
func GroupIDFor(model, defaultModel, base string) string {
	return derivedName(model, defaultModel, base)
}

func derivedName(model, defaultModel, base string) string {
	if defaultModel == "" {
		defaultModel = DefaultModel
	}
	if model == defaultModel {
		return base
	}
	return base + "." + unsafeModelChars.ReplaceAllString(model, "_")
}
