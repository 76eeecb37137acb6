package embedfleet

import "testing"

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
