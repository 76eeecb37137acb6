package embedfleet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

const (
	// DefaultTimeout bounds an Embed call whose ctx has no deadline and whose options set none.
	DefaultTimeout   = 30 * time.Second
	contractRefresh  = 30 * time.Second
	contractRetry    = time.Second
	produceAttempts  = 5
	produceBackoff   = 100 * time.Millisecond
	replyRetentionMs = "3600000" // an orphaned reply topic keeps its data for an hour at most
)

// EmbedOptions are the per-call settings; zero values mean "none".
type EmbedOptions struct {
	Task       string        // a prompt name of the model, e.g. "query"
	Dimensions int           // Matryoshka truncation
	Timeout    time.Duration // 0: ctx's deadline, else DefaultTimeout
	// Long is what the workers do with a text longer than the model reads: LongTruncate,
	// LongPool or LongChunks; "" takes Config.Long (itself "": truncate). Pool and chunks
	// requests go to the workers (their vectors are not cached under the request's key) with
	// the schema header LongInputsSchemaVersion, so workers built before long inputs refuse
	// them instead of truncating.
	Long LongMode
	// Overlap is the tokens shared by consecutive windows (pool and chunks; 0 to
	// WindowOverlapMax); nil takes Config.Overlap, and when that is nil too the workers'
	// DefaultWindowOverlap. new(64) makes one.
	Overlap *int
}

// Embedding is one text's answer as EmbedDetailed returns it: the vector and what the workers
// reported with it.
type Embedding struct {
	Vector    []float32 // nil when the text failed
	Cached    bool      // served by the cache (Redis, or a worker's), not computed
	Truncated bool      // the text (for pool and chunks: a window) was cut at the model's limit
	// Tokens the model read, special tokens included (for pool and chunks: over all windows);
	// 0 when not reported (cache entries written by older workers).
	Tokens int
	// Windows is how many windows of the text were embedded and pooled (long pool and chunks);
	// 0 for truncate.
	Windows int
	// Chunks are the windows with their vectors (long chunks only), in the order of the text.
	Chunks []Chunk
}

// Chunk is one window of a long text (long chunks): its span of the text and its vector.
// Start and End count Unicode code points (not bytes) of the text as sent: Chunk.Of slices it.
type Chunk struct {
	Start, End int // the window is the text's code points [Start, End)
	Tokens     int // tokens the model read for this window
	Vector     []float32
}

// Of returns the chunk's span of text, the text it was computed from (code point offsets).
func (c Chunk) Of(text string) string {
	start, end, n := len(text), len(text), 0
	for i := range text {
		if n == c.Start {
			start = i
		}
		if n == c.End {
			end = i
			break
		}
		n++
	}
	if start > end {
		return ""
	}
	return text[start:end]
}

// Stats counts texts per position in the calls (Produced counts request messages).
type Stats struct {
	Produced, Cached, Computed, Failed int64
	// Mismatched counts results that carried a waiting request's id but not its content
	// hash or width: ignored, the request kept waiting.
	Mismatched int64
}

type wireRequest struct {
	ID             string   `json:"id"`
	Text           string   `json:"text"`
	Task           string   `json:"task,omitempty"`
	Dimensions     int      `json:"dimensions,omitempty"`
	EncodingFormat string   `json:"encoding_format"`
	ReplyTo        string   `json:"reply_to"`
	Long           LongMode `json:"long,omitempty"`    // pool or chunks; truncate is omitted
	Overlap        *int     `json:"overlap,omitempty"` // only with pool or chunks
}

type wireResult struct {
	ID        *string     `json:"id"`
	Key       *string     `json:"key"`
	Dim       int         `json:"dim"`
	Vector    []float64   `json:"vector"`
	VectorB64 *string     `json:"vector_b64"`
	Cached    bool        `json:"cached"`
	Truncated bool        `json:"truncated"`
	Tokens    *int        `json:"tokens"`
	Windows   int         `json:"windows"`
	Chunks    []wireChunk `json:"chunks"`
	Error     *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

type wireChunk struct {
	Start     int       `json:"start"`
	End       int       `json:"end"`
	Tokens    int       `json:"tokens"`
	Vector    []float64 `json:"vector"`
	VectorB64 *string   `json:"vector_b64"`
}

// longSettings are a call's long-input settings: EmbedOptions over Config, checked.
type longSettings struct {
	mode    LongMode // pool or chunks; "" for truncate
	overlap *int     // nil: the workers' default
	spec    string   // LongSpec: what the content hash appends ("" for truncate)
}

func resolveLong(cfg Config, opts EmbedOptions) (longSettings, error) {
	mode, overlap := opts.Long, opts.Overlap
	if mode == "" {
		mode = cfg.Long
	}
	if overlap == nil {
		overlap = cfg.Overlap
	}
	spec, err := LongSpec(mode, overlap)
	if err != nil || !mode.Windowed() {
		return longSettings{}, err
	}
	return longSettings{mode: mode, overlap: overlap, spec: spec}, nil
}

// requestRecord is the Kafka record of one request: a JSON body, keyed by key (the content
// hash), with the schema header of its kind (2 for pool and chunks, else 1).
func requestRecord(topic, key, id, text string, opts EmbedOptions, long longSettings, replyTo string) *kgo.Record {
	request := wireRequest{ID: id, Text: text, Task: opts.Task, Dimensions: opts.Dimensions,
		EncodingFormat: "base64", ReplyTo: replyTo}
	schema := SchemaVersion
	if long.mode.Windowed() {
		request.Long, request.Overlap, schema = long.mode, long.overlap, LongInputsSchemaVersion
	}
	value, _ := json.Marshal(request) // strings and ints: cannot fail
	return &kgo.Record{Topic: topic, Key: []byte(key), Value: value, Headers: []kgo.RecordHeader{
		{Key: "content-type", Value: []byte("application/json")}, {Key: "schema", Value: []byte(schema)}}}
}

// Client embeds texts through the fleet: cache first, then one request per distinct
// miss, keyed by its content hash, answered on a private reply topic. It is safe for
// concurrent use.
type Client struct {
	cfg        Config
	kafka      *kgo.Client // produces requests, administers the reply topic
	replies    *kgo.Client // reads the reply topic
	cache      *cacheReader
	stopPoll   context.CancelFunc
	pollDone   chan struct{}
	mu         sync.Mutex
	pending    map[string]waiter
	contractMu sync.Mutex
	contract   ModelContract
	hasModel   bool
	contractAt time.Time
	produced   atomic.Int64
	cached     atomic.Int64
	computed   atomic.Int64
	failed     atomic.Int64
	mismatched atomic.Int64 // results with a waiting id but the wrong key or width (ignored)
}

func kafkaOptions(cfg Config) ([]kgo.Opt, error) {
	opts := []kgo.Opt{kgo.SeedBrokers(cfg.KafkaBootstrap...), kgo.ClientID("embedfleet-go-" + cfg.ClientID)}
	switch cfg.KafkaSecurityProtocol {
	case "", "PLAINTEXT", "SASL_PLAINTEXT":
	case "SSL", "SASL_SSL":
		tlsConfig, err := kafkaTLS(cfg)
		if err != nil {
			return nil, err
		}
		opts = append(opts, kgo.DialTLSConfig(tlsConfig))
	default:
		return nil, fmt.Errorf("embedfleet: unknown security protocol %q", cfg.KafkaSecurityProtocol)
	}
	if cfg.KafkaSecurityProtocol == "SASL_PLAINTEXT" || cfg.KafkaSecurityProtocol == "SASL_SSL" {
		user, pass := cfg.KafkaSASLUsername, cfg.KafkaSASLPassword
		if user == "" {
			return nil, errors.New("embedfleet: SASL needs EMBEDFLEET_KAFKA_SASL_USERNAME and _PASSWORD")
		}
		switch cfg.KafkaSASLMechanism {
		case "", "PLAIN":
			opts = append(opts, kgo.SASL(plain.Auth{User: user, Pass: pass}.AsMechanism()))
		case "SCRAM-SHA-256":
			opts = append(opts, kgo.SASL(scram.Auth{User: user, Pass: pass}.AsSha256Mechanism()))
		case "SCRAM-SHA-512":
			opts = append(opts, kgo.SASL(scram.Auth{User: user, Pass: pass}.AsSha512Mechanism()))
		default:
			return nil, fmt.Errorf("embedfleet: unknown SASL mechanism %q", cfg.KafkaSASLMechanism)
		}
	}
	return opts, nil
}

// kafkaTLS is the TLS of SSL and SASL_SSL: the CA bundle, and the client certificate and key
// when the brokers require mTLS (as the worker's and the Python client's EMBEDFLEET_KAFKA_SSL_*).
func kafkaTLS(cfg Config) (*tls.Config, error) {
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.KafkaSSLCAFile != "" {
		pool, err := certPool(cfg.KafkaSSLCAFile, "EMBEDFLEET_KAFKA_SSL_CAFILE")
		if err != nil {
			return nil, err
		}
		tlsConfig.RootCAs = pool
	}
	if (cfg.KafkaSSLCertFile == "") != (cfg.KafkaSSLKeyFile == "") {
		return nil, errors.New("embedfleet: mTLS needs both EMBEDFLEET_KAFKA_SSL_CERTFILE and EMBEDFLEET_KAFKA_SSL_KEYFILE")
	}
	if cfg.KafkaSSLCertFile != "" {
		pair, err := tls.LoadX509KeyPair(cfg.KafkaSSLCertFile, cfg.KafkaSSLKeyFile)
		if err != nil {
			return nil, fmt.Errorf("embedfleet: EMBEDFLEET_KAFKA_SSL_CERTFILE/KEYFILE: %w", err)
		}
		tlsConfig.Certificates = []tls.Certificate{pair}
	}
	return tlsConfig, nil
}

// certPool reads a PEM CA bundle; setting names the variable that pointed to it.
func certPool(path, setting string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("embedfleet: %s: %w", setting, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("embedfleet: %s: no certificate in %s", setting, path)
	}
	return pool, nil
}

// NewClient connects, creates the private reply topic and starts reading it.
func NewClient(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.ClientID == "" {
		cfg.ClientID = newClientID()
	}
	if len(cfg.KafkaBootstrap) == 0 || cfg.RequestsTopic == "" || cfg.ResultsTopic == "" {
		return nil, errors.New("embedfleet: KafkaBootstrap, RequestsTopic and ResultsTopic are required (see ConfigFromEnv)")
	}
	if _, err := LongSpec(cfg.Long, cfg.Overlap); err != nil {
		return nil, err
	}
	if cfg.Linger == 0 {
		cfg.Linger = 5 * time.Millisecond
	}
	if cfg.RedisTimeout == 0 {
		cfg.RedisTimeout = time.Second
	}
	base, err := kafkaOptions(cfg)
	if err != nil {
		return nil, err
	}
	cache, err := newCacheReader(cfg)
	if err != nil {
		return nil, err
	}
	c := &Client{cfg: cfg, cache: cache, pending: make(map[string]waiter)}
	// Idempotent with acks=all is franz-go's default; linger batches the requests of a call.
	// No compression: franz-go's default (snappy) is a codec the Python workers may lack.
	producerOpts := append(base, kgo.ProducerLinger(cfg.Linger), kgo.ProducerBatchCompression(kgo.NoCompression()))
	if c.kafka, err = kgo.NewClient(producerOpts...); err != nil {
		return nil, c.fail(err)
	}
	if err = c.kafka.Ping(ctx); err != nil {
		return nil, c.fail(fmt.Errorf("embedfleet: cannot reach Kafka at %v (%w): start the local stack with "+
			"`embedfleet stack up`, or set EMBEDFLEET_KAFKA_BOOTSTRAP", cfg.KafkaBootstrap, err))
	}
	topic := cfg.ReplyTopic()
	retention := replyRetentionMs
	created, err := kadm.NewClient(c.kafka).CreateTopic(ctx, 1, -1, map[string]*string{"retention.ms": &retention}, topic)
	if err == nil && created.Err != nil && !errors.Is(created.Err, kerr.TopicAlreadyExists) {
		err = created.Err
	}
	if err != nil {
		return nil, c.fail(fmt.Errorf("embedfleet: cannot create the reply topic %s: %w", topic, err))
	}
	c.replies, err = kgo.NewClient(append(base,
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {0: kgo.NewOffset().AtStart()}}),
		kgo.FetchMaxWait(100*time.Millisecond))...)
	if err != nil {
		return nil, c.fail(err)
	}
	pollCtx, stop := context.WithCancel(context.Background())
	c.stopPoll, c.pollDone = stop, make(chan struct{})
	go c.poll(pollCtx)
	c.modelContract(ctx)
	return c, nil
}

func (c *Client) fail(err error) error {
	_ = c.Close()
	return err
}

// Close stops reading, deletes the reply topic and closes the connections.
func (c *Client) Close() error {
	if c.stopPoll != nil {
		c.stopPoll()
		<-c.pollDone
		c.stopPoll = nil
	}
	if c.replies != nil {
		c.replies.Close()
		c.replies = nil
	}
	var err error
	if c.kafka != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if resp, deleteErr := kadm.NewClient(c.kafka).DeleteTopic(ctx, c.cfg.ReplyTopic()); deleteErr != nil {
			err = deleteErr
		} else if resp.Err != nil && !errors.Is(resp.Err, kerr.UnknownTopicOrPartition) {
			err = resp.Err
		}
		c.kafka.Close()
		c.kafka = nil
	}
	if cacheErr := c.cache.close(); err == nil {
		err = cacheErr
	}
	return err
}

// Stats returns the counters since the client started.
func (c *Client) Stats() Stats {
	return Stats{Produced: c.produced.Load(), Cached: c.cached.Load(), Computed: c.computed.Load(),
		Failed: c.failed.Load(), Mismatched: c.mismatched.Load()}
}

// ModelContract returns the fingerprint (and dim) content hashes need: from the Config,
// else from Redis; ok is false when neither has it.
func (c *Client) ModelContract(ctx context.Context) (ModelContract, bool) {
	return c.modelContract(ctx)
}

func (c *Client) modelContract(ctx context.Context) (ModelContract, bool) {
	c.contractMu.Lock()
	defer c.contractMu.Unlock()
	age := time.Since(c.contractAt)
	if (c.hasModel && age < contractRefresh) || (!c.hasModel && age < contractRetry) {
		return c.contract, c.hasModel
	}
	c.contractAt = time.Now()
	published, ok := c.cache.contract(ctx)
	switch {
	case c.cfg.ModelFingerprint != "":
		c.contract, c.hasModel = ModelContract{Fingerprint: c.cfg.ModelFingerprint, Dim: c.cfg.ModelDim}, true
		if c.contract.Dim == 0 && ok && published.Fingerprint == c.cfg.ModelFingerprint {
			c.contract.Dim = published.Dim
		}
	case ok:
		c.contract, c.hasModel = published, true
	}
	return c.contract, c.hasModel
}

func (c *Client) poll(ctx context.Context) {
	defer close(c.pollDone)
	for {
		fetches := c.replies.PollFetches(ctx)
		if ctx.Err() != nil {
			return
		}
		// Fetch errors (a topic not yet visible, a broker restart) are retried by franz-go.
		fetches.EachRecord(func(record *kgo.Record) { c.dispatch(record.Value) })
	}
}

// waiter is one request waiting for its result. An id alone proves nothing (anyone who may
// write the reply topic can send a result with it), so a result must also carry the content
// hash the request was keyed by (when known) and the width asked for (when known).
type waiter struct {
	ch  chan wireResult
	key string // "" when the client could not compute the content hash
	dim int    // 0 when not known
}

func (w waiter) accepts(result wireResult) bool {
	if result.Error != nil { // validation errors carry no key
		return result.Key == nil || w.key == "" || *result.Key == w.key
	}
	if w.key != "" && (result.Key == nil || *result.Key != w.key) {
		return false
	}
	return w.dim == 0 || result.Dim == w.dim
}

func (c *Client) dispatch(value []byte) {
	var result wireResult
	if err := json.Unmarshal(value, &result); err != nil || result.ID == nil {
		return
	}
	c.mu.Lock()
	w, ok := c.pending[*result.ID]
	if ok && !w.accepts(result) {
		ok = false
		c.mismatched.Add(1)
	}
	if ok {
		delete(c.pending, *result.ID)
	}
	c.mu.Unlock()
	if ok {
		w.ch <- result // buffered: never blocks
	}
}

func (c *Client) forget(ids []string) {
	c.mu.Lock()
	for _, id := range ids {
		delete(c.pending, id)
	}
	c.mu.Unlock()
}

// Embed returns one vector per text, in order. On per-text failures it returns the
// vectors it has (nil where a text failed) and a *BatchError; when results are still
// missing as ctx ends (or opts.Timeout passes) it returns a *TimeoutError.
func (c *Client) Embed(ctx context.Context, texts []string, opts EmbedOptions) ([][]float32, error) {
	embeddings, err := c.EmbedDetailed(ctx, texts, opts)
	if embeddings == nil {
		return nil, err
	}
	vectors := make([][]float32, len(embeddings))
	for i, e := range embeddings {
		vectors[i] = e.Vector
	}
	return vectors, err
}

// EmbedDetailed is Embed returning each text's Embedding: the vector with the token count, the
// cached and truncated flags and, for long inputs (EmbedOptions.Long pool or chunks), the number
// of windows and (chunks) every window's span and vector. Errors as Embed's; a failed text's
// Embedding is the zero value.
func (c *Client) EmbedDetailed(ctx context.Context, texts []string, opts EmbedOptions) ([]Embedding, error) {
	long, err := resolveLong(c.cfg, opts)
	if err != nil {
		return nil, err
	}
	if opts.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.Timeout)
		defer cancel()
	} else if _, has := ctx.Deadline(); !has {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	contract, known := c.modelContract(ctx)
	fingerprint := ""
	if known {
		fingerprint = contract.Fingerprint
	}
	p, err := planRequests(texts, fingerprint, opts.Task, opts.Dimensions, long.spec)
	if err != nil {
		return nil, err
	}
	vectors := make([]Embedding, len(texts))
	failures := append([]TextError(nil), p.failures...)
	c.failed.Add(int64(len(p.failures)))
	misses := p.distinct
	dim := opts.Dimensions
	if dim == 0 {
		dim = contract.Dim
	}
	// A pooled vector is not cached under its request's key (only its windows are, as plain
	// texts): long pool and chunks requests always go to the workers.
	if p.byContentHash && dim > 0 && c.cache.enabled() && !long.mode.Windowed() {
		keys := make([]string, len(p.distinct))
		for i, entry := range p.distinct {
			keys[i] = entry.key
		}
		misses = nil
		for i, entry := range c.cache.lookupEntries(ctx, keys, dim) {
			if entry == nil {
				misses = append(misses, p.distinct[i])
				continue
			}
			fill(vectors, p.distinct[i].indices, Embedding{Vector: entry.Vector, Cached: true, Tokens: entry.Tokens})
			c.cached.Add(int64(len(p.distinct[i].indices)))
		}
	}

	ids := make([]string, len(misses))
	channels := make([]chan wireResult, len(misses))
	records := make([]*kgo.Record, len(misses))
	c.mu.Lock()
	for i, entry := range misses {
		ids[i], channels[i] = newRequestID(), make(chan wireResult, 1)
		w := waiter{ch: channels[i], dim: dim}
		if p.byContentHash {
			w.key = entry.key
		}
		c.pending[ids[i]] = w
		records[i] = requestRecord(c.cfg.RequestsTopic, entry.key, ids[i], entry.text, opts, long, c.cfg.ReplyTopic())
	}
	c.mu.Unlock()
	defer c.forget(ids)

	if err := c.produce(ctx, records); err != nil {
		if ctx.Err() == nil {
			return nil, err
		}
		missing := 0
		for _, entry := range misses {
			missing += len(entry.indices)
		}
		c.failed.Add(int64(missing))
		return vectors, &TimeoutError{Missing: missing, Total: len(texts), Failures: failures, Cause: ctx.Err()}
	}
	missing := 0
	for i, entry := range misses {
		var result wireResult
		select {
		case result = <-channels[i]:
		case <-ctx.Done():
			select { // a result may have arrived at the same moment
			case result = <-channels[i]:
			default:
				missing += len(entry.indices)
				continue
			}
		}
		failures = c.record(result, entry, vectors, failures)
	}
	if missing > 0 {
		c.failed.Add(int64(missing))
		return vectors, &TimeoutError{Missing: missing, Total: len(texts), Failures: failures, Cause: ctx.Err()}
	}
	if len(failures) > 0 {
		sort.Slice(failures, func(a, b int) bool { return failures[a].Index < failures[b].Index })
		return vectors, &BatchError{Failures: failures, Total: len(texts)}
	}
	return vectors, nil
}

func (c *Client) record(result wireResult, entry *distinctText, vectors []Embedding, failures []TextError) []TextError {
	fail := func(code, message string) []TextError {
		for _, index := range entry.indices {
			failures = append(failures, TextError{Index: index, Code: code, Message: message})
		}
		c.failed.Add(int64(len(entry.indices)))
		return failures
	}
	if result.Error != nil {
		return fail(result.Error.Code, result.Error.Message)
	}
	embedding, err := decodeEmbedding(result)
	if err != nil {
		return fail("invalid_result", err.Error())
	}
	fill(vectors, entry.indices, embedding)
	if result.Cached {
		c.cached.Add(int64(len(entry.indices)))
	} else {
		c.computed.Add(int64(len(entry.indices)))
	}
	return failures
}

// decodeEmbedding reads a successful result: its vector (vector_b64 or vector), its counts and,
// for long chunks, every chunk's span and vector (each as wide as the pooled vector).
func decodeEmbedding(result wireResult) (Embedding, error) {
	vector, err := decodeVector(result.Vector, result.VectorB64)
	if err != nil {
		return Embedding{}, err
	}
	e := Embedding{Vector: vector, Cached: result.Cached, Truncated: result.Truncated, Windows: result.Windows}
	if result.Tokens != nil {
		e.Tokens = *result.Tokens
	}
	if len(result.Chunks) > 0 {
		e.Chunks = make([]Chunk, len(result.Chunks))
		for i, wc := range result.Chunks {
			chunkVector, err := decodeVector(wc.Vector, wc.VectorB64)
			if err != nil {
				return Embedding{}, fmt.Errorf("chunk %d: %w", i, err)
			}
			if len(chunkVector) != len(vector) {
				return Embedding{}, fmt.Errorf("chunk %d has %d values, the vector %d", i, len(chunkVector), len(vector))
			}
			if wc.Start < 0 || wc.End < wc.Start {
				return Embedding{}, fmt.Errorf("chunk %d spans [%d, %d)", i, wc.Start, wc.End)
			}
			e.Chunks[i] = Chunk{Start: wc.Start, End: wc.End, Tokens: wc.Tokens, Vector: chunkVector}
		}
	}
	return e, nil
}

// decodeVector reads a vector from whichever field carries it (vector_b64 first).
func decodeVector(floats []float64, encoded *string) ([]float32, error) {
	switch {
	case encoded != nil:
		return DecodeVectorBase64(*encoded)
	case floats != nil:
		vector := make([]float32, len(floats))
		for i, f := range floats {
			vector[i] = float32(f)
		}
		return vector, nil
	}
	return nil, errors.New("result carries no vector")
}

// fill gives repeated texts their own copies, so changing one vector never changes another.
func fill(embeddings []Embedding, indices []int, e Embedding) {
	embeddings[indices[0]] = e
	for _, index := range indices[1:] {
		c := e
		c.Vector = append([]float32(nil), e.Vector...)
		if e.Chunks != nil {
			c.Chunks = make([]Chunk, len(e.Chunks))
			for i, chunk := range e.Chunks {
				chunk.Vector = append([]float32(nil), chunk.Vector...)
				c.Chunks[i] = chunk
			}
		}
		embeddings[index] = c
	}
}

// produce sends the records and waits for the broker's acks, retrying transient failures with backoff.
func (c *Client) produce(ctx context.Context, records []*kgo.Record) error {
	pending := records
	for attempt := 1; len(pending) > 0; attempt++ {
		var retry []*kgo.Record
		for _, outcome := range c.kafka.ProduceSync(ctx, pending...) {
			switch {
			case outcome.Err == nil:
				c.produced.Add(1)
			case ctx.Err() != nil:
				return ctx.Err()
			case attempt < produceAttempts && (kerr.IsRetriable(outcome.Err) || errors.Is(outcome.Err, kgo.ErrRecordTimeout)):
				r := outcome.Record
				retry = append(retry, &kgo.Record{Topic: r.Topic, Key: r.Key, Value: r.Value, Headers: r.Headers})
			default:
				return fmt.Errorf("embedfleet: could not produce to %s: %w; does the topic exist "+
					"(`embedfleet stack up` creates it)?", c.cfg.RequestsTopic, outcome.Err)
			}
		}
		if len(retry) > 0 {
			select {
			case <-time.After(produceBackoff << (attempt - 1)):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		pending = retry
	}
	return nil
}
