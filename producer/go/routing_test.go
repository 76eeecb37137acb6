package embedfleet

import (
	"reflect"
	"testing"
)

// The naming rule reproduces the Python examples (schemas/testdata/model_routing.json).
func TestRoutingMatchesThePythonRule(t *testing.T) {
	var file struct {
		Cases []struct {
			Model         string `json:"model"`
			DefaultModel  string `json:"default_model"`
			TopicBase     string `json:"topic_base"`
			GroupBase     string `json:"group_base"`
			RequestsTopic string `json:"requests_topic"`
			GroupID       string `json:"group_id"`
		} `json:"cases"`
	}
	readJSON(t, "model_routing.json", &file)
	if len(file.Cases) < 5 {
		t.Fatalf("only %d cases", len(file.Cases))
	}
	for _, c := range file.Cases {
		if got := RequestsTopicFor(c.Model, c.DefaultModel, c.TopicBase); got != c.RequestsTopic {
			t.Errorf("RequestsTopicFor(%q, %q): %q, want %q", c.Model, c.DefaultModel, got, c.RequestsTopic)
		}
		if got := GroupIDFor(c.Model, c.DefaultModel, c.GroupBase); got != c.GroupID {
			t.Errorf("GroupIDFor(%q, %q): %q, want %q", c.Model, c.DefaultModel, got, c.GroupID)
		}
	}
}

// A client of another model sends to that model's topic unless the topic is set explicitly.
func TestConfigDerivesTheModelsRequestsTopic(t *testing.T) {
	// The stack test runs this package with the fleet's own topic set: start from none.
	t.Setenv("EMBEDFLEET_REQUESTS_TOPIC", "")
	t.Setenv("EMBEDFLEET_DEFAULT_MODEL", "")
	t.Setenv("EMBEDFLEET_MODEL_NAME", "all-mpnet-base-v2")
	if got := ConfigFromEnv().RequestsTopic; got != "embed.requests.all-mpnet-base-v2" {
		t.Errorf("RequestsTopic %q", got)
	}
	t.Setenv("EMBEDFLEET_REQUESTS_TOPIC", "jobs")
	if got := ConfigFromEnv().RequestsTopic; got != "jobs" {
		t.Errorf("explicit RequestsTopic %q", got)
	}
	t.Setenv("EMBEDFLEET_MODEL_NAME", "")
	t.Setenv("EMBEDFLEET_REQUESTS_TOPIC", "")
	if got := ConfigFromEnv().RequestsTopic; got != "embed.requests" {
		t.Errorf("default RequestsTopic %q", got)
	}
}

// A client reads the fleet's default model (EMBEDFLEET_DEFAULT_MODEL, as the workers do): a fleet
// that serves MPNet on the base topic sends MiniLM's jobs to the derived one.
func TestConfigReadsTheFleetsDefaultModel(t *testing.T) {
	t.Setenv("EMBEDFLEET_REQUESTS_TOPIC", "")
	t.Setenv("EMBEDFLEET_DEFAULT_MODEL", "all-mpnet-base-v2")
	t.Setenv("EMBEDFLEET_MODEL_NAME", "all-mpnet-base-v2")
	cfg := ConfigFromEnv()
	if cfg.DefaultModel != "all-mpnet-base-v2" || cfg.RequestsTopic != "embed.requests" {
		t.Errorf("DefaultModel %q, RequestsTopic %q", cfg.DefaultModel, cfg.RequestsTopic)
	}
	t.Setenv("EMBEDFLEET_MODEL_NAME", "")
	if got := ConfigFromEnv().RequestsTopic; got != "embed.requests.all-MiniLM-L6-v2" {
		t.Errorf("RequestsTopic of MiniLM with MPNet the default %q", got)
	}
	t.Setenv("EMBEDFLEET_DEFAULT_MODEL", "")
	if got := ConfigFromEnv(); got.DefaultModel != DefaultModel || got.RequestsTopic != "embed.requests" {
		t.Errorf("unset: DefaultModel %q, RequestsTopic %q", got.DefaultModel, got.RequestsTopic)
	}
}

// A client of the fleet's default model, configured with the base topic, targets every model of
// the shared examples: RequestsTopicOf and ForModel give the Python rule's topics.
func TestRequestsTopicOfAndForModelFollowTheSharedExamples(t *testing.T) {
	var file struct {
		Cases []struct {
			Model         string `json:"model"`
			DefaultModel  string `json:"default_model"`
			TopicBase     string `json:"topic_base"`
			RequestsTopic string `json:"requests_topic"`
		} `json:"cases"`
	}
	readJSON(t, "model_routing.json", &file)
	for _, c := range file.Cases {
		base := Config{
			ModelName: c.DefaultModel, DefaultModel: c.DefaultModel, RequestsTopic: c.TopicBase,
			ModelFingerprint: "fp-of-the-default", ModelDim: 384, ClientID: "app",
		}
		if got := base.RequestsTopicOf(c.Model); got != c.RequestsTopic {
			t.Errorf("RequestsTopicOf(%q) with default %q: %q, want %q", c.Model, c.DefaultModel, got, c.RequestsTopic)
		}
		other := base.ForModel(c.Model)
		if other.RequestsTopic != c.RequestsTopic || other.ModelName != c.Model {
			t.Errorf("ForModel(%q): topic %q model %q, want %q", c.Model, other.RequestsTopic, other.ModelName, c.RequestsTopic)
		}
		if c.Model == c.DefaultModel {
			if !reflect.DeepEqual(other, base) {
				t.Errorf("ForModel of the client's own model changed it: %+v", other)
			}
			continue
		}
		// Another model's contract is its own: read from Redis, not the default model's.
		if other.ModelFingerprint != "" || other.ModelDim != 0 {
			t.Errorf("ForModel(%q) kept the default model's contract: %q %d", c.Model, other.ModelFingerprint, other.ModelDim)
		}
		if other.ReplyTopic() == base.ReplyTopic() {
			t.Errorf("ForModel(%q) shares the reply topic %q", c.Model, other.ReplyTopic())
		}
	}
	// A client of a non-default model with the default topic set explicitly: other models by the
	// rule on the standard base, its own on its configured topic.
	mpnet := Config{ModelName: "all-mpnet-base-v2", DefaultModel: DefaultModel, RequestsTopic: "mpnet-jobs"}
	if got := mpnet.RequestsTopicOf("all-mpnet-base-v2"); got != "mpnet-jobs" {
		t.Errorf("own model's topic %q", got)
	}
	if got := mpnet.RequestsTopicOf(DefaultModel); got != BaseRequestsTopic {
		t.Errorf("default model's topic from a client of another model %q", got)
	}
}
